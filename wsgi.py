"""The WSGI entry point for gunicorn (`wsgi:app`) and Zappa (`wsgi.app`)."""

from service import create_app

app = create_app()
