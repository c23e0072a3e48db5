"""The subcommands of `uptrain`: plain functions whose docstrings are their help.

Each takes what the command line gives (paths, option strings), checks it, runs its stage and prints
what a user reads. They raise and never exit, so they are also the Python API (`uptrain_gqa.convert`, ...).
"""
