"""`python -m services.payments`: read the environment, then serve until SIGTERM."""

from libs.common.settings import PaymentsSettings
from libs.common.web import main
from services.payments.app import create_app

if __name__ == "__main__":
    main(PaymentsSettings, create_app)
