"""HTTP layer: dependencies, request parsing, routes. Routes stay thin and call :mod:`service.services`."""
