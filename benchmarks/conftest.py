"""Collect the benchmark modules (benchmark_<op>.py) when pytest is pointed at this folder;
a module named on the command line is collected by pytest itself."""
import pytest


def pytest_collect_file(file_path, parent):
    if (file_path.suffix == ".py" and file_path.name.startswith("benchmark_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
