"""The gateway's HTTP routes, one APIRouter per resource; each route gets what it needs from the application
state (gateway/state.py) through the dependencies of deps.py."""
