"""Helpers shared by the test suite, imported as ``helpers.<module>``.

pyproject's ``[tool.pytest.ini_options] pythonpath = ["tests"]`` puts ``tests/`` on ``sys.path``, as pytest
recommends instead of importing from ``conftest``.  Fixtures stay in the conftest files; what a fixture or a
test calls lives here:

* ``host``: the paths the suite works with, and the host state every test must leave as found;
* ``inner``: running inner pytest sessions and reading their junitxml;
* ``rootless_env``: an interpreter and directories uid 65534 can use;
* ``images``: real container images made with umoci and skopeo.
"""
