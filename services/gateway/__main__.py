"""`python -m services.gateway`: read the environment, then serve until SIGTERM."""

from libs.common.settings import GatewaySettings
from libs.common.web import main
from services.gateway.app import create_app

if __name__ == "__main__":
    main(GatewaySettings, create_app)
