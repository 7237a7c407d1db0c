"""Benchmarks: run by ``make bench``; each writes JSON and Markdown with its command,
machine and date into ``results/``."""
