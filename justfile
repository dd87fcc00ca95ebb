# Development tasks for shardchat. Run `just --list` to see them.

python := ".venv/bin/python"

# Create the virtual environment and install shardchat with its test, benchmark and dev extras.
install:
    python3 -m venv .venv
    {{python}} -m pip install -e '.[test,bench,dev]'

# Run the test suite.
test *args:
    {{python}} -m pytest {{args}}

# Run the reference workload (1000 students, 10 teachers) against a local server.
bench *args:
    {{python}} -m shardchat bench {{args}}

# Per-core scaling benchmark: 1 and 2 workers, three runs each.
scaling *args:
    {{python}} benchmarks/scaling.py --workers 1,2 --repeat 3 --out benchmarks/results/latest {{args}}

# Run the server on port 4000.
serve *args:
    {{python}} -m shardchat serve {{args}}

# Check formatting and lint.
lint:
    {{python}} -m ruff check shardchat router tests benchmarks
    {{python}} -m ruff format --check shardchat router tests benchmarks
