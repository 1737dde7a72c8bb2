"""`python -m services.provider`: read the environment, then serve until SIGTERM."""

from libs.common.logs import configure_logging
from libs.common.settings import ProviderSettings, load_settings
from libs.common.web import run
from services.provider.app import create_app


def main() -> None:
    settings = load_settings(ProviderSettings)
    configure_logging(ProviderSettings.service_name, settings.log_level)
    run(create_app(settings), settings)


if __name__ == "__main__":
    main()
