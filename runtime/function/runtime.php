<?php
// A minimal Lambda Runtime API loop: fetch the next event, call the handler,
// post its result or its error.
//
// $_HANDLER names a file relative to $LAMBDA_TASK_ROOT that returns a
// callable taking ($event, $context).
//
// NOTE: minimal by design. It has no context object beyond an array, no
// handling of fatal errors inside an invocation and no response size check.

declare(strict_types=1);

$api = 'http://' . getenv('AWS_LAMBDA_RUNTIME_API') . '/2018-06-01';
$taskRoot = getenv('LAMBDA_TASK_ROOT') ?: '/var/task';
$handlerFile = $taskRoot . '/' . getenv('_HANDLER');

function runtime_request(string $method, string $url, ?string $body = null, array $headers = []): array
{
    $responseHeaders = [];
    $curl = curl_init($url);
    curl_setopt_array($curl, [
        CURLOPT_CUSTOMREQUEST => $method,
        CURLOPT_RETURNTRANSFER => true,
        CURLOPT_HTTPHEADER => $headers,
        CURLOPT_HEADERFUNCTION => function ($curl, string $line) use (&$responseHeaders): int {
            $parts = explode(':', $line, 2);
            if (count($parts) === 2) {
                $responseHeaders[strtolower(trim($parts[0]))] = trim($parts[1]);
            }
            return strlen($line);
        },
    ]);
    if ($body !== null) {
        curl_setopt($curl, CURLOPT_POSTFIELDS, $body);
    }
    $responseBody = curl_exec($curl);
    if ($responseBody === false) {
        throw new RuntimeException("Runtime API request $method $url failed: " . curl_error($curl));
    }
    return [$responseHeaders, $responseBody];
}

function runtime_error_document(Throwable $error): string
{
    return json_encode([
        'errorType' => get_class($error),
        'errorMessage' => $error->getMessage(),
        'stackTrace' => explode("\n", $error->getTraceAsString()),
    ]);
}

try {
    if (!is_file($handlerFile)) {
        throw new RuntimeException("Handler file $handlerFile not found");
    }
    $handler = require $handlerFile;
    if (!is_callable($handler)) {
        throw new RuntimeException("Handler file $handlerFile does not return a callable");
    }
} catch (Throwable $error) {
    fwrite(STDERR, "Init error: {$error->getMessage()}\n");
    runtime_request('POST', "$api/runtime/init/error", runtime_error_document($error), [
        'Content-Type: application/json',
        'Lambda-Runtime-Function-Error-Type: Runtime.InitError',
    ]);
    exit(1);
}

while (true) {
    [$headers, $body] = runtime_request('GET', "$api/runtime/invocation/next");
    $requestId = $headers['lambda-runtime-aws-request-id'] ?? '';
    if (isset($headers['lambda-runtime-trace-id'])) {
        putenv('_X_AMZN_TRACE_ID=' . $headers['lambda-runtime-trace-id']);
    }
    $context = [
        'awsRequestId' => $requestId,
        'deadlineMs' => (int) ($headers['lambda-runtime-deadline-ms'] ?? 0),
        'invokedFunctionArn' => $headers['lambda-runtime-invoked-function-arn'] ?? '',
        'traceId' => $headers['lambda-runtime-trace-id'] ?? '',
    ];
    try {
        $result = $handler(json_decode($body, true), $context);
        runtime_request('POST', "$api/runtime/invocation/$requestId/response", json_encode($result, JSON_THROW_ON_ERROR));
    } catch (Throwable $error) {
        fwrite(STDERR, "Invocation error: {$error->getMessage()}\n");
        runtime_request('POST', "$api/runtime/invocation/$requestId/error", runtime_error_document($error), [
            'Content-Type: application/json',
            'Lambda-Runtime-Function-Error-Type: Unhandled',
        ]);
    }
}
