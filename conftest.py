"""Puts the repository root on ``sys.path`` for pytest (its mere presence does, in prepend mode).

``tests/conftest.py`` puts ``tests/`` on ``sys.path``; without the root there too, the folders
``tests/training`` and ``tests/service`` would be imported as namespace packages in place of the
real ``training`` and ``service`` packages (the editable install's finder runs after the path
finder, which prefers a namespace portion to nothing).
"""
