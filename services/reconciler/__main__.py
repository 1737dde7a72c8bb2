"""`python -m services.reconciler`: read the environment, then serve until SIGTERM."""

from libs.common.settings import ReconcilerSettings
from libs.common.web import main
from services.reconciler.app import create_app

if __name__ == "__main__":
    main(ReconcilerSettings, create_app)
