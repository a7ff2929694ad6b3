"""Helpers shared by the step scripts: command-line plumbing, files, attacks, defenses, figures."""
