"""A service stub for tests whose Expand / Verify are one message each on the service's step stream (the only way
the services take them): a StepError comes back as AioRpcError with its code and details, as a call's status."""

from __future__ import annotations

from orchestrator.clients import StepStream


class StepStub:
    def __init__(self, stub) -> None:
        self.stub = stub
        self.expand_stream = StepStream(stub.ExpandStream, "ExpandStream") if hasattr(stub, "ExpandStream") else None
        self.verify_stream = StepStream(stub.VerifyStream, "VerifyStream") if hasattr(stub, "VerifyStream") else None

    def __getattr__(self, name: str):  # Describe, Release, Prefill, the streams themselves
        return getattr(self.stub, name)

    async def Expand(self, request, timeout: float | None = 60.0):
        return await self.expand_stream.request(request, timeout)

    async def Verify(self, request, timeout: float | None = 60.0):
        return await self.verify_stream.request(request, timeout)
