from clusters.api.views import HostViewSet
from labsite.api import OptionalSlashRouter

router = OptionalSlashRouter()
router.register("hosts", HostViewSet, basename="host")

urlpatterns = router.urls
