"""The request pipeline (PROTOCOL.md §4 top to bottom), records, errors, rate limits."""
