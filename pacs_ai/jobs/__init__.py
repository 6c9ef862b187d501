"""Running a job: the floor above ``analyze`` and ``encode``.

``analyze`` turns a volume into results and nothing more; ``encode`` turns
results into DICOM objects.  A job (fetch the series, load it, analyze it,
encode SEG and SR, record the results, open the deliveries) ties them
together here, so neither layer has to know about the index, the object
store or the broker.
"""
