"""blendgate's admin web UI: the static single-page app under `static/`, served at /admin and /admin/static/."""
