"""A LangChain retriever that queries a running blendgate gateway over HTTP.

    from blendgate.retriever.langchain import BlendgateRetriever
    retriever = BlendgateRetriever(base_url="http://127.0.0.1:8000", collection="docs", top_k=4)
    documents = retriever.invoke("How many points did the Panthers defense surrender?")

Needs the `langchain` extra (langchain-core).
"""

from __future__ import annotations

from typing import Any

import httpx
from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
from langchain_core.documents import Document
from langchain_core.retrievers import BaseRetriever
from pydantic import Field

from . import defaults


class BlendgateRetrieverError(RuntimeError):
    """The gateway refused the query; the message is the gateway's own."""


class BlendgateRetriever(BaseRetriever):
    base_url: str = "http://127.0.0.1:8000"
    collection: str
    top_k: int = Field(defaults.TOP_K, ge=1, le=100)
    api_key: str | None = None
    timeout_s: float = 30.0

    def _request(self, query: str) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        return {"url": f"{self.base_url.rstrip('/')}/v1/retrieve", "headers": headers,
                "json": {"collection": self.collection, "query": query, "top_k": self.top_k}}

    @staticmethod
    def _documents(response: httpx.Response) -> list[Document]:
        if response.status_code != 200:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:200]
            raise BlendgateRetrieverError(f"blendgate answered {response.status_code}: {message}")
        return [Document(page_content=hit["text"], id=hit["id"],
                         metadata={"id": hit["id"], "source": hit["source"], "position": hit["position"],
                                   "score": hit["score"]})
                for hit in response.json()["data"]]

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        with httpx.Client(timeout=self.timeout_s) as client:
            return self._documents(client.post(**self._request(query)))

    async def _aget_relevant_documents(self, query: str, *,
                                       run_manager: AsyncCallbackManagerForRetrieverRun) -> list[Document]:
        async with httpx.AsyncClient(timeout=self.timeout_s) as client:
            return self._documents(await client.post(**self._request(query)))
