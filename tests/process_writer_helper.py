"""Helper run as a separate process: ``process_writer_helper.py STORE PID_FILE`` hands four blocks to a ProcessWriter,
records its child's pid, and dies by SIGKILL with blocks in flight."""

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from conftest import block_data, small_schema  # noqa: E402

from actstore.process_writer import ProcessWriter  # noqa: E402
from actstore.writer import StoreWriter  # noqa: E402

if __name__ == "__main__":
    schema = small_schema(capacity=16)
    writer = ProcessWriter(StoreWriter.create(sys.argv[1], schema), max_pending_blocks=2)
    Path(sys.argv[2]).write_text(json.dumps({"child": writer._process.pid}))
    first = None
    for block in range(4):
        images, ids, prompts, text = block_data(schema, block)
        future = writer.submit_block(block, images, ids, prompts, text)
        first = first or future
    first.result()  # at least one block complete, others in flight
    os.kill(os.getpid(), signal.SIGKILL)
