from libs.service import run_service
from services.persist.service import DEFINITION

run_service(DEFINITION)
