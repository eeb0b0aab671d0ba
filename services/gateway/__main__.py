from libs.service import run_service
from services.gateway.service import DEFINITION

run_service(DEFINITION)
