"""Transports: how a command reaches a node (local, paramiko, openssh), and the ssh configuration they share."""
