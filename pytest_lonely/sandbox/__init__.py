"""The container engine: namespaces, root filesystems, the launcher and its helpers.

Nothing in this package imports pytest.  Its unit of work is "run this
callable as PID 1 of a container built from this spec, stream its frames
back, tell me how it ended"; the pytest adapter in the parent package sits on
top of it.
"""
