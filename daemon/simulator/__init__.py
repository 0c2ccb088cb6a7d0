"""A ComfyUI simulator that speaks the real wire protocol (FACTS.md, the transcripts).

It is an independent witness of the protocol: it imports nothing from
``protocol/`` or the daemon's task code.

Starting it
-----------
::

    sim = ComfySimulator(SimulatorConfig(step_time=0.01))
    port = await nursery.start(sim.run, ("127.0.0.1", 0))      # or a list of listeners
    # ... http://127.0.0.1:{port}/prompt, ws://127.0.0.1:{port}/ws?clientId=...

    await run_simulator("127.0.0.1", 8188, config)              # the CLI's entry point

What it serves
--------------
ComfyUI 0.3.64's API, every route also under ``/api``: POST/GET ``/prompt``,
GET/POST ``/queue``, POST ``/interrupt``, GET/POST ``/history``,
GET ``/history/{id}``, GET ``/view``, POST ``/upload/image``, GET
``/system_stats``, ``/object_info``, ``/object_info/{Name}``, ``/features`` and
the WebSocket ``/ws?clientId=C``. Nodes: EmptyImage, the capture's probe nodes
(SlowProgress, FailingNode, PreviewProgress), SaveImage, PreviewImage,
CheckpointLoaderSimple, CLIPTextEncode, EmptyLatentImage, KSampler (one tick per
step), VAEDecode, VAEEncode, VAEEncodeForInpaint, LoadImage, SolidMask,
MaskComposite, ImageScale. Images are real PNGs drawn from the seed and prompt,
kept in memory.

Knobs (fault injection)
-----------------------
Settable from Python (``ComfySimulator`` methods) and over HTTP:
``POST /sim/control`` with a JSON object of any of the keys below (applied in
this order; the reply is the state), ``GET /sim/state`` to read them back.
``GET /sim/history/{prompt_id}/wait`` answers 200 once that prompt has finished
(a test in another process waits for it without polling).
``/sim/*`` is never under ``/api`` and is never rejected.

``step_time``  (seconds or null)
    Seconds per progress step of every node. null: probe nodes sleep their own
    ``delay`` input, KSampler ``SimulatorConfig.sampler_step_time``.
``slow_factor``  (> 0)
    Multiplies every step's duration.
``fail_at``  (node id, class_type, or null)
    Matching nodes raise ``RuntimeError`` when they start: ``execution_error``.
``manual_steps``  (bool) and ``grant_steps``  (int)
    Manual mode: each progress step waits for a permit instead of a clock;
    ``grant_steps`` hands out permits. For deterministic tests.
``go_silent``  (bool)
    Keep every socket open but deliver no frame at all (a zombie server).
    HTTP keeps working; frames produced meanwhile are lost.
``drop_websockets``  (true)
    Close every WebSocket now, abruptly (TCP closed, no close frame).
``restart``  (true)
    Like a ComfyUI restart: pending and running prompts, history, cache, temp
    files and the ``number`` counter are gone, sockets are cut, the running
    prompt sends nothing more. Input and output files survive (they are on disk
    in a real ComfyUI).
``reject_connections``  (seconds)
    ComfyUI is "down" for that long: WebSockets are cut and every new request
    is answered with a TCP reset once its head is read. 0 ends it early.

Known gaps vs real ComfyUI
--------------------------
- No permessage-deflate on the WebSocket.
- ``/view`` ignores ``preview=`` (webp/jpeg) and ``channel=``: it always sends the file.
- Sampler previews (only with ``SimulatorConfig.sampler_previews``, as ComfyUI
  sends them only with a preview method configured) are JPEG by default
  (``preview_format="png"`` for PNG), drawn block-flat like a latent preview
  (``jpeg.py``), encoded in a worker thread; the probe node's are PNG, like the
  capture's. Type 4 goes to a socket that sent ``supports_preview_metadata``,
  type 1 otherwise; ``preview_metadata=False`` is a ComfyUI from before feature
  flags (no answer, always type 1). ``sampler_progress_text`` adds a type 3
  text per sampler step, which ComfyUI's own KSampler does not send.
  ``prompt_ids=False`` is a ComfyUI from before POST /prompt took a
  ``prompt_id``: it makes up every prompt's id.
- ``traceback`` lists are the simulator's own frames; ``current_inputs`` holds
  descriptive strings, not torch reprs.
- Lists ComfyUI builds from sets (output nodes, ``executed``, ``current_outputs``)
  come out in a fixed order.
- No ``/internal``, ``/models``, ``/embeddings``, ``/userdata``, ``/upload/mask``
  or frontend routes.
- Files live in memory; beyond ``max_stored_files`` the oldest generated files go,
  beyond ``max_input_bytes`` the oldest uploads.
- The loopback test of the Origin rule does no DNS lookup (localhost names and
  IP literals only).
"""

from daemon.simulator.app import ComfySimulator, run_simulator
from daemon.simulator.config import SimulatorConfig
from daemon.simulator.control import ControlError, SimulatorControls

__all__ = [
    "ComfySimulator",
    "ControlError",
    "SimulatorConfig",
    "SimulatorControls",
    "run_simulator",
]
