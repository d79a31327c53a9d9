"""What `serve` prints when the replica fails in its constructor: the innermost cause, one line,
out of the deployment's status (a traceback of Serve's and Ray's frames around it)."""

from jamba_ray.serve.launch import failure_cause

# Shape of a real DEPLOY_FAILED status (a stage whose shard is corrupt), frames elided.
STATUS = """Deploying application jamba failed: Failed to update the deployments ['JambaServer'].
Traceback (most recent call last):
  File ".../ray/serve/_private/deployment_state.py", line 1555, in check_ready
ray.exceptions.RayTaskError(RuntimeError): \x1b[36mray::ServeReplica:jamba:JambaServer.initialize\
_and_get_metadata()\x1b[39m (pid=14947, ip=192.0.2.2)
RuntimeError: Traceback (most recent call last):
  File ".../jamba_ray/runtime/pipeline.py", line 120, in _wait
    raise StageFailedError(f"{what} failed: {e}") from None
jamba_ray.errors.StageFailedError: stage start-up failed: The actor died because of an error \
raised in its creation task, \x1b[36mray::Stage.__init__()\x1b[39m (pid=15181, ip=192.0.2.2)
  File ".../jamba_ray/model/checkpoint.py", line 172, in load_slice
safetensors._safetensors_rust.SafetensorError: Error while deserializing header: header too large
"""


def test_the_innermost_exception_line_is_the_cause():
    assert failure_cause(STATUS) == (
        "safetensors._safetensors_rust.SafetensorError: "
        "Error while deserializing header: header too large"
    )


def test_without_an_exception_line_the_last_line_is_said():
    assert failure_cause("Deploying application jamba failed: timeout\n") == (
        "Deploying application jamba failed: timeout"
    )
    assert failure_cause("") == "no reason given"
