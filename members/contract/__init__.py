"""The stage contract: what members, ensemble and submission share, torch-free.

Config files and their loaders (`config`, `schema` for an experiment, `member` for one member,
`cluster`), the stage files and their checks (`stagefiles`; `verify`, the one check that a member's
files are current; `filehash`, file hashes read once per process), atomic writes (`atomic`), the command-line
conventions (`cli`) and the metrics every stage reports (`metrics`). Importing any of these loads no
torch; `tests/test_layout.py` keeps it so.
"""
