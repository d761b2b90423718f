"""The user commands, one module per verb (up, exec, kill, logs, status/ps, stacks, check, lint)."""
