"""The worklist's routers, one module per area; each ``router(context)`` builds its APIRouter.

* :mod:`~pacs_ai.worklist.routes.auth`: log in and out (pages and API);
* :mod:`~pacs_ai.worklist.routes.worklist`: the worklist, study pages, key images;
* :mod:`~pacs_ai.worklist.routes.reports`: accept, edit, reject, impression drafting, FHIR;
* :mod:`~pacs_ai.worklist.routes.admin`: the admin console (admin role only).
"""
