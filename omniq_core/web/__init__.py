"""The `omniq dashboard` web UI (needs `omniq[web]`): aiohttp server in app.py, access
rules in security.py, HTML/CSS/JS shipped as package data in static/."""
