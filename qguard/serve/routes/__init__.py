"""The HTTP surfaces, one module each, each with its `router` (`serve.app` includes them).

A router whose routes hold a request slot while they run is `APIRouter(route_class=deps.GuardedRoute)`;
a route reads the app's shared objects through `deps.StateDep`.
"""
