# twistd -ny greyfox.tac  -- runs GreyFox without plugin discovery.
# Settings come from the environment (GREYFOX_*, OPENAI_API_KEY, ...) and GREYFOX_CONFIG.
from twisted.application import service

from greyfox.tap import Options, makeService

application = service.Application("greyfox")
options = Options()
options.parseOptions([])
makeService(options).setServiceParent(application)
