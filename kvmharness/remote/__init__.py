"""Remote rigs: run kvmharness on AMD hosts over SSH and bring the results home.

``inventory`` (rigs from a TOML file), ``errors`` (one rig unreachable or
unusable), ``ssh`` (the one module importing paramiko), ``rig`` (check/run
orchestration, one thread per rig), ``progress`` (live per-rig lines),
``cli`` (`kvmharness rig check|run`).  Nothing is imported here, and only
``ssh`` needs paramiko, so a rig without it can still import the rest.
"""
