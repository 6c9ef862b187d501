"""Administrator operations shared by the CLI (:mod:`pacs_ai.cli`) and the admin console (the worklist).

One code path for each thing an administrator does or looks at, whichever
way they come: retry, cancel and reprocess (:mod:`pacs_ai.ops.jobs`), the
service's health (:mod:`pacs_ai.ops.status`), a study's routing, jobs,
deliveries and timeline (:mod:`pacs_ai.ops.studies`), the routing rules tester
(:mod:`pacs_ai.ops.rules`) and the audit search (:mod:`pacs_ai.ops.audit`).
The callers render the answers (a terminal table, JSON or an HTML page) and
say who acted (``cli:<login>`` or the worklist user), for the audit trail.
"""
