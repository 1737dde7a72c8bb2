"""Benchmarks: bounded loads on 127.0.0.1, each figure a ratio to a baseline of the same run.

`python -m bench` (or `make bench`) makes its own databases (copies of one migrated
template) and RabbitMQ vhosts, starts the services as real processes, runs every
scenario, prints the table and writes `bench/results/<timestamp>.json` and `.png`.
Everything it made is removed at the end, whatever happened.
"""
