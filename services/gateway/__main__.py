"""`python -m services.gateway`: read the environment, then serve until SIGTERM."""

from libs.common.logs import configure_logging
from libs.common.settings import GatewaySettings, load_settings
from libs.common.web import run
from services.gateway.app import create_app


def main() -> None:
    settings = load_settings(GatewaySettings)
    configure_logging(GatewaySettings.service_name, settings.log_level)
    run(create_app(settings), settings)


if __name__ == "__main__":
    main()
