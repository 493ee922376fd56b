"""Echo ServerApp/ClientApp: each round sends the arrays to every site for "training" and for
"evaluation", and the sites answer at once. Round times are Flower's floor for that pattern."""

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    config = context.run_config
    arrays = ArrayRecord({"weights": Array(np.zeros(int(config["parameters"]), dtype=np.float32))})
    while len(list(grid.get_node_ids())) < int(config["sites"]):
        time.sleep(0.5)
    for server_round in range(1, int(config["rounds"]) + 1):
        started = time.perf_counter()
        phases = {}
        for kind in (MessageType.TRAIN, MessageType.EVALUATE):
            phase_started = time.perf_counter()
            content = RecordDict({"arrays": arrays, "config": ConfigRecord({"server-round": server_round})})
            messages = [Message(content, node, kind) for node in grid.get_node_ids()]
            grid.send_and_receive(messages, timeout=300)
            phases[f"{kind}_phase_s"] = time.perf_counter() - phase_started
        with Path(str(config["output"])).open("a") as out:
            out.write(json.dumps({"round": server_round, "seconds": time.perf_counter() - started, **phases}) + "\n")


@client.train()
def train(msg: Message, context: Context) -> Message:
    content = RecordDict({"arrays": msg.content["arrays"], "metrics": MetricRecord({"num-examples": 1})})
    return Message(content, reply_to=msg)


@client.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)
