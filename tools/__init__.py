"""Project tools: proto generation, model building, training the reference pair."""
