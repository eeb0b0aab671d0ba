from libs.service import run_service
from services.transform.service import DEFINITION

run_service(DEFINITION)
