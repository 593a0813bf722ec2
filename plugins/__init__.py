"""qbench's built-in backends. Each module is a plugin registered through the
``qbench`` entry-point group in pyproject.toml, exactly like a third-party one."""
