"""`python -m services.webhooks`: read the environment, then serve until SIGTERM."""

from libs.common.logs import configure_logging
from libs.common.settings import WebhooksSettings, load_settings
from libs.common.web import run
from services.webhooks.app import create_app


def main() -> None:
    settings = load_settings(WebhooksSettings)
    configure_logging(WebhooksSettings.service_name, settings.log_level)
    run(create_app(settings), settings)


if __name__ == "__main__":
    main()
