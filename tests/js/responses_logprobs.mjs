// The AI SDK's openai.responses provider asking for logprobs (tests/test_sampling.py), JSON and streamed.
// Usage: node responses_logprobs.mjs <base_url> <question>; prints {"text", "logprobs", "streamed"} as one JSON line.
import { generateText, streamText } from "ai";
import { createOpenAI } from "@ai-sdk/openai";

const openai = createOpenAI({ baseURL: process.argv[2], apiKey: "unused" });
const options = { model: openai.responses("m"), prompt: process.argv[3], maxRetries: 0,
                  providerOptions: { openai: { logprobs: 2 } } };
const whole = await generateText(options);
const stream = streamText(options);
for await (const _ of stream.textStream) { /* read to the end */ }
console.log(JSON.stringify({ text: whole.text, logprobs: whole.providerMetadata?.openai?.logprobs ?? null,
                             streamed: (await stream.providerMetadata)?.openai?.logprobs ?? null }));
