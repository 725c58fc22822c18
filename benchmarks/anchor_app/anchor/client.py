"""ClientApp: Flower's example shape (partition from node_config, train, reply)."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from anchor.task import federation
from fedmerge.training import train_local

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    fed = federation(context)
    partition = int(context.node_config["partition-id"])
    model = fed.initial_model()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    x, y = fed.client_data(partition)
    server_round = int(msg.content["config"]["server-round"])
    gen = torch.Generator().manual_seed(fed.client_seed(server_round, partition))
    result = train_local(model, x, y, fed.config.train, generator=gen)
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"num-examples": result.num_examples}),
        }
    )
    return Message(content=content, reply_to=msg)
