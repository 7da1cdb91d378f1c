# An existing Twisted application that also runs a mailhub hub.
#
#   twistd -ny examples/embed.tac
#
# makeHubService returns an IService: the hub starts and stops with the
# application, beside whatever else it runs (here, a trivial web page).
import os

from twisted.application import service, strports
from twisted.web import resource, server, static

from mailhub.config import load
from mailhub.service import makeHubService

here = os.path.dirname(os.path.abspath(__file__))
config = load(os.environ.get("MAILHUB_CONFIG", os.path.join(here, "hub.toml")))

application = service.Application("my-app-with-a-mail-hub")

root = resource.Resource()
root.putChild(b"", static.Data(b"the rest of my application\n", "text/plain"))
strports.service(os.environ.get("APP_WEB", "tcp:8080:interface=127.0.0.1"), server.Site(root)).setServiceParent(application)

makeHubService(config).setServiceParent(application)
