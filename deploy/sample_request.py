"""Ask a running kvmesh router one question with the standard OpenAI client."""

from __future__ import annotations

import argparse

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base-url", default="http://127.0.0.1:8000/v1")
    parser.add_argument("--question", default="What is the capital of France?")
    args = parser.parse_args()
    client = OpenAI(base_url=args.base_url, api_key="unused")
    model = client.models.list().data[0].id
    reply = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": args.question}],
        temperature=0,
        max_tokens=64,
    )
    print(f"{model}: {reply.choices[0].message.content}")
    print(f"usage: {reply.usage.model_dump()}")


if __name__ == "__main__":
    main()
