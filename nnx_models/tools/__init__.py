"""Tools over the model zoo: the Metal zoo build (`nox -s metal`) and the benchmarks (`nox -s bench`)."""
