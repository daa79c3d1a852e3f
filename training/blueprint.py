"""The training blueprint (filled in by the training issue)."""

from flask import Blueprint, Flask

bp = Blueprint("training", __name__)


def register_training(app: Flask) -> None:
    app.register_blueprint(bp)
