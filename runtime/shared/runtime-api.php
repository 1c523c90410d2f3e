<?php
// The parts of the Lambda Runtime API client that the function runtime and
// the FPM runtime share: the HTTP client, the invocation context, the error
// documents and the limits.

declare(strict_types=1);

namespace PhpLambdaLayers\Runtime;

/**
 * Exit status that asks /opt/bootstrap to start a fresh PHP process: the
 * runtime has already reported the failed invocation.
 */
const EXIT_RESTART = 75;

/** Largest response Lambda accepts for a synchronous invocation (6 MB). */
const MAX_RESPONSE_BYTES = 6291456;

/** Flags of every JSON document the runtime writes. */
const JSON_FLAGS = JSON_THROW_ON_ERROR | JSON_UNESCAPED_SLASHES | JSON_UNESCAPED_UNICODE | JSON_PRESERVE_ZERO_FRACTION;

/** Writes one line to the function's log (stderr). */
function log_line(string $message): void
{
    fwrite(STDERR, rtrim($message, "\n") . "\n");
}

/** An error that the runtime reports with its own `errorType`. */
final class RuntimeError extends \RuntimeException
{
    public function __construct(public readonly string $errorType, string $message, ?\Throwable $previous = null)
    {
        parent::__construct($message, 0, $previous);
    }
}

/**
 * What the handler receives as `$context`: the invocation's headers and
 * the function's environment.
 */
final class Context implements \JsonSerializable
{
    /**
     * @param array<mixed>|null $clientContext
     * @param array<mixed>|null $identity
     */
    public function __construct(
        private readonly string $awsRequestId,
        private readonly int $deadlineMs,
        private readonly string $invokedFunctionArn,
        private readonly string $traceId,
        private readonly ?array $clientContext = null,
        private readonly ?array $identity = null,
    ) {
    }

    public function getAwsRequestId(): string
    {
        return $this->awsRequestId;
    }

    /** The deadline of the invocation, in milliseconds since the epoch. */
    public function getDeadlineMs(): int
    {
        return $this->deadlineMs;
    }

    /** Milliseconds left before Lambda stops the invocation. */
    public function getRemainingTimeInMillis(): int
    {
        return max(0, $this->deadlineMs - (int) floor(microtime(true) * 1000));
    }

    public function getInvokedFunctionArn(): string
    {
        return $this->invokedFunctionArn;
    }

    /** The X-Ray trace header, also in the `_X_AMZN_TRACE_ID` variable. */
    public function getTraceId(): string
    {
        return $this->traceId;
    }

    /** @return array<mixed>|null the client context of a mobile SDK call */
    public function getClientContext(): ?array
    {
        return $this->clientContext;
    }

    /** @return array<mixed>|null the Amazon Cognito identity of the caller */
    public function getIdentity(): ?array
    {
        return $this->identity;
    }

    public function getFunctionName(): string
    {
        return (string) getenv('AWS_LAMBDA_FUNCTION_NAME');
    }

    public function getFunctionVersion(): string
    {
        return (string) getenv('AWS_LAMBDA_FUNCTION_VERSION');
    }

    public function getMemoryLimitInMb(): int
    {
        return (int) getenv('AWS_LAMBDA_FUNCTION_MEMORY_SIZE');
    }

    public function getLogGroupName(): string
    {
        return (string) getenv('AWS_LAMBDA_LOG_GROUP_NAME');
    }

    public function getLogStreamName(): string
    {
        return (string) getenv('AWS_LAMBDA_LOG_STREAM_NAME');
    }

    /** @return array<string, mixed> */
    public function jsonSerialize(): array
    {
        return [
            'awsRequestId' => $this->awsRequestId,
            'deadlineMs' => $this->deadlineMs,
            'remainingTimeInMillis' => $this->getRemainingTimeInMillis(),
            'invokedFunctionArn' => $this->invokedFunctionArn,
            'traceId' => $this->traceId,
            'clientContext' => $this->clientContext,
            'identity' => $this->identity,
            'functionName' => $this->getFunctionName(),
            'functionVersion' => $this->getFunctionVersion(),
            'memoryLimitInMb' => $this->getMemoryLimitInMb(),
            'logGroupName' => $this->getLogGroupName(),
            'logStreamName' => $this->getLogStreamName(),
        ];
    }
}

/** One event handed out by `GET next`. */
final class Invocation
{
    public function __construct(public readonly string $payload, public readonly Context $context)
    {
    }

    public function requestId(): string
    {
        return $this->context->getAwsRequestId();
    }
}

/**
 * A client of the Runtime API. It keeps one curl handle, so every request
 * reuses the same keep-alive connection.
 */
final class RuntimeApi
{
    private string $base;
    private \CurlHandle $curl;

    public static function fromEnvironment(): self
    {
        $address = getenv('AWS_LAMBDA_RUNTIME_API');
        if ($address === false || $address === '') {
            log_line('AWS_LAMBDA_RUNTIME_API is not set: this program runs inside Lambda, which sets it.');
            exit(1);
        }
        return new self($address);
    }

    public function __construct(string $address)
    {
        $this->base = "http://$address/2018-06-01/runtime";
        $this->curl = curl_init();
    }

    /** Waits for the next event. */
    public function next(): Invocation
    {
        [$status, $headers, $body] = $this->request('GET', '/invocation/next');
        if ($status !== 200) {
            throw new \RuntimeException("GET next failed with HTTP $status: $body");
        }
        $requestId = $headers['lambda-runtime-aws-request-id'] ?? '';
        if ($requestId === '') {
            throw new \RuntimeException('GET next returned no Lambda-Runtime-Aws-Request-Id header');
        }
        $traceId = $headers['lambda-runtime-trace-id'] ?? '';
        if ($traceId === '') {
            putenv('_X_AMZN_TRACE_ID');
            unset($_SERVER['_X_AMZN_TRACE_ID'], $_ENV['_X_AMZN_TRACE_ID']);
        } else {
            putenv("_X_AMZN_TRACE_ID=$traceId");
            $_SERVER['_X_AMZN_TRACE_ID'] = $_ENV['_X_AMZN_TRACE_ID'] = $traceId;
        }
        $context = new Context(
            $requestId,
            (int) ($headers['lambda-runtime-deadline-ms'] ?? 0),
            $headers['lambda-runtime-invoked-function-arn'] ?? '',
            $traceId,
            self::jsonHeader($headers, 'lambda-runtime-client-context'),
            self::jsonHeader($headers, 'lambda-runtime-cognito-identity'),
        );
        return new Invocation($body, $context);
    }

    /**
     * Posts the response of an invocation. A body over the limit is reported
     * as the invocation's error instead.
     */
    public function respond(string $requestId, string $body): void
    {
        $size = strlen($body);
        if ($size > MAX_RESPONSE_BYTES) {
            $this->fail($requestId, new RuntimeError(
                'Function.ResponseSizeTooLarge',
                "The response is $size bytes; Lambda accepts at most " . MAX_RESPONSE_BYTES . ' bytes (6 MB)',
            ));
            return;
        }
        [$status, , $reply] = $this->request('POST', "/invocation/$requestId/response", $body);
        if ($status === 413) {
            $this->fail($requestId, new RuntimeError('Function.ResponseSizeTooLarge', "Lambda rejected the response: $reply"));
        } elseif ($status >= 300) {
            log_line("Lambda rejected the response of invocation $requestId with HTTP $status: $reply");
        }
    }

    /** Reports the failure of an invocation and logs it. */
    public function fail(string $requestId, \Throwable $error): void
    {
        log_line("Invocation $requestId failed: " . self::describe($error));
        $this->postError("/invocation/$requestId/error", $error);
    }

    /** Reports a failure before the first invocation and logs it. */
    public function failInit(\Throwable $error): void
    {
        log_line('The runtime could not start: ' . self::describe($error));
        $this->postError('/init/error', $error);
    }

    /** @return array{errorType: string, errorMessage: string, stackTrace: list<string>} */
    public static function errorDocument(\Throwable $error): array
    {
        $type = $error instanceof RuntimeError ? $error->errorType : get_class($error);
        $message = $error->getMessage();
        for ($previous = $error->getPrevious(); $previous !== null; $previous = $previous->getPrevious()) {
            $message .= ' (caused by ' . get_class($previous) . ': ' . $previous->getMessage() . ')';
        }
        $stackTrace = [];
        if (!$error instanceof RuntimeError) {
            $stackTrace[] = sprintf('%s:%d', $error->getFile(), $error->getLine());
            foreach (explode("\n", $error->getTraceAsString()) as $frame) {
                $stackTrace[] = $frame;
            }
        }
        return ['errorType' => $type, 'errorMessage' => $message, 'stackTrace' => $stackTrace];
    }

    private static function describe(\Throwable $error): string
    {
        if ($error instanceof RuntimeError) {
            return "{$error->errorType}: {$error->getMessage()}";
        }
        return (string) $error;
    }

    private function postError(string $path, \Throwable $error): void
    {
        $document = self::errorDocument($error);
        $body = json_encode($document, JSON_FLAGS | JSON_INVALID_UTF8_SUBSTITUTE);
        $this->request('POST', $path, $body, ['Lambda-Runtime-Function-Error-Type: ' . $document['errorType']]);
    }

    /** @return array<mixed>|null */
    private static function jsonHeader(array $headers, string $name): ?array
    {
        if (!isset($headers[$name]) || $headers[$name] === '') {
            return null;
        }
        $value = json_decode($headers[$name], true);
        return is_array($value) ? $value : null;
    }

    /**
     * @param list<string> $headers
     * @return array{0: int, 1: array<string, string>, 2: string}
     */
    private function request(string $method, string $path, ?string $body = null, array $headers = []): array
    {
        $responseHeaders = [];
        curl_reset($this->curl);
        $options = [
            CURLOPT_URL => $this->base . $path,
            CURLOPT_RETURNTRANSFER => true,
            // `next` blocks until an event arrives, for as long as it takes.
            CURLOPT_TIMEOUT => 0,
            CURLOPT_HEADERFUNCTION => static function ($curl, string $line) use (&$responseHeaders): int {
                $parts = explode(':', $line, 2);
                if (count($parts) === 2) {
                    $responseHeaders[strtolower(trim($parts[0]))] = trim($parts[1]);
                }
                return strlen($line);
            },
        ];
        if ($body !== null) {
            $options[CURLOPT_POST] = true;
            $options[CURLOPT_POSTFIELDS] = $body;
            // No `Expect: 100-continue` round trip before large bodies.
            $headers[] = 'Expect:';
            $headers[] = 'Content-Type: application/json';
        }
        $options[CURLOPT_HTTPHEADER] = $headers;
        curl_setopt_array($this->curl, $options);
        $reply = curl_exec($this->curl);
        if ($reply === false) {
            throw new \RuntimeException("$method {$this->base}$path failed: " . curl_error($this->curl));
        }
        return [curl_getinfo($this->curl, CURLINFO_RESPONSE_CODE), $responseHeaders, $reply];
    }
}
