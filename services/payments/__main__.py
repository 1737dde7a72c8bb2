"""`python -m services.payments`: read the environment, then serve until SIGTERM."""

from libs.common.logs import configure_logging
from libs.common.settings import PaymentsSettings, load_settings
from libs.common.web import run
from services.payments.app import create_app


def main() -> None:
    settings = load_settings(PaymentsSettings)
    configure_logging(PaymentsSettings.service_name, settings.log_level)
    run(create_app(settings), settings)


if __name__ == "__main__":
    main()
