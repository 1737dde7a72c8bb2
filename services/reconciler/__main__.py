"""`python -m services.reconciler`: read the environment, then serve until SIGTERM."""

from libs.common.logs import configure_logging
from libs.common.settings import ReconcilerSettings, load_settings
from libs.common.web import run
from services.reconciler.app import create_app


def main() -> None:
    settings = load_settings(ReconcilerSettings)
    configure_logging(ReconcilerSettings.service_name, settings.log_level)
    run(create_app(settings), settings)


if __name__ == "__main__":
    main()
