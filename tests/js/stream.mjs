// openai-node against the server (tests/test_clients.py): a chat stream, a Responses stream and a JSON answer.
// Usage: node stream.mjs <base_url>; prints {"chat", "responses", "json"} as one JSON line.
import OpenAI from "openai";

const client = new OpenAI({ baseURL: process.argv[2], apiKey: "unused", maxRetries: 0 });
const messages = [{ role: "user", content: "Say forty words." }];

let chat = "";
for await (const chunk of await client.chat.completions.create({ model: "m", messages, stream: true })) {
  chat += chunk.choices[0]?.delta?.content ?? "";
}
let responses = "";
for await (const event of await client.responses.create({ model: "m", input: "Say forty words.", stream: true })) {
  if (event.type === "response.output_text.delta") responses += event.delta;
}
const json = (await client.chat.completions.create({ model: "m", messages })).choices[0].message.content;
console.log(JSON.stringify({ chat, responses, json }));
