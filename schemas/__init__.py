"""JSON Schemas of the federation protocol, the canonical JSON codec and the validators."""
