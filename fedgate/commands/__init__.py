"""The `fedgate` subcommands' bodies (`fedgate/cli.py` holds the parser): each ``cmd_*``
takes the parsed arguments and returns the exit code."""
