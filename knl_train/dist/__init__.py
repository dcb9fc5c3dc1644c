"""Distributed glue: Horovod initialisation, collectives, rank-aware helpers."""
